"""Files: the one atomic writer, shards and digests (:mod:`.files`, imported by every layer) and salr's
saved-model directory, format version 2 (:mod:`.saved_model`: ``salr.save`` / ``salr.load``).

Nothing is imported here: :mod:`.files` sits below the ops and :mod:`.saved_model` above the
methods, so importing the package must not pull one in with the other."""
