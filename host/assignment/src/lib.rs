//! Assignments: the streaming, authenticated file format; change detection between a staging tree and a shadow copy; rsync-class deltas.
