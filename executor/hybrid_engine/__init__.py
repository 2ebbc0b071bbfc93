"""The 3D-HybridEngine (paper §5): the actor's move between training and generation layouts."""
