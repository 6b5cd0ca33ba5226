from episode2lora.cli import main

main()
