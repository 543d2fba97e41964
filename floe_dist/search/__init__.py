"""The search machinery behind ``floe-dist search``: trial programs and the runners that start them."""
