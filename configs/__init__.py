"""The run configs that ship with flowmill, as ``flowmill.configs``: ``flowmill config show mmdit_tiny``
prints one, and every command that takes a config accepts its name (``flowmill.config_files``)."""
