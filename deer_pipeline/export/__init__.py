"""Standard exports: Camtrap DP packages, flat sightings CSV, camera deployments, the deer roster."""
