"""Training and evaluating the relighting net: instance pools and batches (:mod:`.data`), the
perturbations it learns to undo (:mod:`.perturb`), the training loop (:mod:`.train`), an IC-Light
teacher to distil (:mod:`.teacher`) and the held-out evaluation (:mod:`.evaluate`). The runtime
relighters never import this package."""
