from pipeline.demo import main

raise SystemExit(main())
