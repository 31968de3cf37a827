from sockserve.cli.main import main

raise SystemExit(main())
