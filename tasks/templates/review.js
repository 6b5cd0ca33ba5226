(() => {
  const data = JSON.parse(document.getElementById('review-data').textContent);
  const button = document.getElementById('resume');
  const status = document.getElementById('review-status');
  const say = text => { status.textContent = text; };
  document.querySelectorAll('button.layer').forEach(b => b.addEventListener('click', () => {
    const on = b.getAttribute('aria-pressed') !== 'true';
    b.setAttribute('aria-pressed', String(on));
    b.classList.toggle('excluded', on);
  }));
  document.querySelectorAll('input.include').forEach(box => box.addEventListener('change', () =>
    box.closest('.card').classList.toggle('off', !box.checked)));

  function answers() {
    return data.clusters.map(id => {
      const card = document.getElementById('cluster-' + id);
      return {cluster_id: id, selected: card.querySelector('input.include').checked,
              name: card.querySelector('input.name').value.trim(), trigger: card.querySelector('input.trigger').value.trim(),
              exclude: [...card.querySelectorAll("button.layer[aria-pressed='true']")].map(b => b.dataset.layer)};
    });
  }

  async function headers() {
    const h = {'Content-Type': 'application/json'};
    const password = localStorage.getItem('prefect-password');  // set by the Prefect UI on a server with --auth
    if (password) h.Authorization = 'Basic ' + password;
    const client = 'review-page-' + Math.random().toString(36).slice(2);
    const r = await fetch(data.api + '/csrf-token?client=' + client, {headers: h});
    if (r.ok) Object.assign(h, {'Prefect-Csrf-Token': (await r.json()).token, 'Prefect-Csrf-Client': client});
    return h;
  }

  async function runState() {
    const r = await fetch(data.api + '/flow_runs/' + data.flow_run_id, {headers: await headers()});
    return r.ok ? (await r.json()).state : null;
  }

  async function resume() {
    const bad = [...document.querySelectorAll('input.trigger')].find(i => i.value.includes(','));
    if (bad) { bad.focus(); say('A trigger word has no commas.'); return; }
    button.disabled = true;
    say('Resuming...');
    try {
      const r = await fetch(data.api + '/flow_runs/' + data.flow_run_id + '/resume', {method: 'POST',
        headers: await headers(), body: JSON.stringify({run_input: {clusters: answers()}})});
      const body = await r.json().catch(() => ({}));
      if (!r.ok || body.status !== 'ACCEPT')
        throw new Error((body.details && body.details.reason) || JSON.stringify(body.detail || body) || r.status);
      say('Resumed: the run continues with these answers.');
      document.body.dataset.resumed = 'true';
    } catch (e) {
      say('Not resumed: ' + e.message);
      button.disabled = false;
    }
  }

  button.addEventListener('click', resume);
  if (location.protocol === 'file:') {  // no API beside a page opened from the disk
    button.disabled = true;
    say('Open this page through the Prefect server (the link on the paused run), or answer in its Resume form.');
    return;
  }
  runState().then(state => {
    if (state && state.type !== 'PAUSED') { button.disabled = true; say('This run is ' + state.name + ', not waiting for a review.'); }
  }).catch(() => {});
})();
