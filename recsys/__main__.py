from recsys.app.cli import main

raise SystemExit(main())
