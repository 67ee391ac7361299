"""The engine: load a checkpoint, place it on devices, and generate replies as a stream of typed events."""
