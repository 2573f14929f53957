from trafficmgr.core.cli import main

raise SystemExit(main())
