from bench.gpu.suite import main

raise SystemExit(main())
