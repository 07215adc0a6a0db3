"""Local protocol peers: servers on 127.0.0.1 that speak a destination kind's wire
protocol, for the tests and for running the portal without any cloud account."""
