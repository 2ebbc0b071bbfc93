"""The built-in task: string transformations with a checkable answer, and its artifacts."""
