from nbiafs.cli import main

raise SystemExit(main())
