"""Console-script entry points of acr-optim."""
