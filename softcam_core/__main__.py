from softcam_core.cli import main

raise SystemExit(main())
