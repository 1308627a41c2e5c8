"""Framework adapters: :mod:`.mmdet` (mmdetection 3.x), :mod:`.detectron2`, and the torch-only
parts they share (:mod:`.common`). Importing this package imports no framework."""
