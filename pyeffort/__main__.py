"""``python -m pyeffort``: the command line (see pyeffort.cli)."""

from pyeffort.cli import main

raise SystemExit(main())
