"""Device-side trainers over exported artifacts; each backend is torch-free."""
