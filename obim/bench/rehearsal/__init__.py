"""The CPU rehearsal of the real experiments: stand-in models and hub-layout mirrors."""
