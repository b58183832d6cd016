"""Shop: an e-commerce backend as Python microservices."""
