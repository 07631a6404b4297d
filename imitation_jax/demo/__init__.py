"""The demo's synthetic world: conversations in a teacher style, for the bundled CPU demo."""
