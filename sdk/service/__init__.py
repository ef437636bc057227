"""The deployment service: the deployment config, the Controller that wires engine, loop and
bridges, the advisor, metrics and systemd notification."""
