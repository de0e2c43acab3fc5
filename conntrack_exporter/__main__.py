from conntrack_exporter.cli import main

raise SystemExit(main())
