from converters.cli.main import main

raise SystemExit(main())
