"""``python -m medsynth_cli`` runs the command line (also under ``accelerate launch -m``)."""

from medsynth_cli.app import main

main()
