"""The router: the public front door of the mesh (RouterService and AdminService)."""
