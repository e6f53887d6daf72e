"""Everything HTTP and FHIR; talks to ml/ only through ml.pipeline.Analyzer."""

__version__ = "0.1.0"
