"""Reading and writing: checkpoints (:mod:`.checkpoint`, hashed by :mod:`.digest`), atomic
outputs and formats (:mod:`.output`), the JSON documents' readers (:mod:`.documents`) and
schema ids (:mod:`.schemas`), and what a terminal shows (:mod:`.terminal`)."""
