"""The simulation harness: many virtual sites, privacy-budget sweeps (python -m simulations.run)."""
