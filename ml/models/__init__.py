"""Named models behind one small interface (see base.LoadedModel and registry.load_model)."""
