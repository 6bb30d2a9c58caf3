from shadowlane.cli import main

raise SystemExit(main())
