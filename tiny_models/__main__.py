"""``python -m tiny_models DIR``: build every tiny model into DIR."""

from tiny_models.build import main

raise SystemExit(main())
