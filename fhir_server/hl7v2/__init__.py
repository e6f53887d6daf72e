"""HL7 v2.5.1 results out: the ORU^R01 of an analysis (oru.py) sent over MLLP (mllp.py)."""
