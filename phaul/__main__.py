from phaul.cli import main

raise SystemExit(main())
