from slora_kernels.app.cli import main

raise SystemExit(main())
