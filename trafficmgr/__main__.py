from trafficmgr.cli import main

raise SystemExit(main())
