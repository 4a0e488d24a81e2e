"""Speed (and memory) of an update against plain sampling and against the peers (``make bench``)."""
