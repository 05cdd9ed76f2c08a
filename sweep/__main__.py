"""``python -m sweep`` runs the command line."""

from sweep.cli import main

raise SystemExit(main())
