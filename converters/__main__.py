from converters.cli import main

raise SystemExit(main())
