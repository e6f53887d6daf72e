"""Everything that knows pixels and models; nothing about HTTP or FHIR."""
