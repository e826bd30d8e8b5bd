"""What a study will run, before anything runs: the study file (:mod:`.study`), its cells and their fingerprints
(:mod:`.cells`) and the stage-1 checkpoint each cell starts from (:mod:`.pretrain`). Imports only ``dset``."""
