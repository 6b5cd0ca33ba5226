document.addEventListener('change', () => {
  const ids = [...document.querySelectorAll('input.exclude:checked')].map(b => b.dataset.layer);
  document.getElementById('overrides').value = ids.length
    ? 'layers:\n' + ids.map(i => '  "' + i + '": {exclude: true}').join('\n') : 'layers: {}';
});
