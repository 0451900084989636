from slora_kernels.cli import main

raise SystemExit(main())
