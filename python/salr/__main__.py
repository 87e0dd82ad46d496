from salr.cli import main

raise SystemExit(main())
