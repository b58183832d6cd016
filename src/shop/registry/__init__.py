"""The discovery server: instances register, renew a lease and find each other (Eureka REST)."""
