"""``python -m kvpack``: the command line (as the ``kvpack`` script)."""

from kvpack.cli import main

raise SystemExit(main())
