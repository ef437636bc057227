"""The advisor example: a small language model beside the factory loop that names the heated
tank's condition and proposes setpoints (``train`` builds and scores it; ``states`` draws plant
states and their right advice; ``deploy.toml`` puts it beside the demo's policy)."""
