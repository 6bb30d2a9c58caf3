"""`python -m shadowlane.demo`: the demo without the `shadowlane` command."""

from shadowlane.demo import main

raise SystemExit(main())
