"""``python -m midasflow`` runs the command-line interface."""
import sys

from midasflow.cli import main

sys.exit(main())
