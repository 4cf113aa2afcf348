"""Credentials built from settings. Imported lazily: azure-identity is heavy for a cold start."""

from __future__ import annotations

import base64

from shared.settings import MARKETPLACE_RESOURCE_ID, Settings

MARKETPLACE_SCOPE = f"{MARKETPLACE_RESOURCE_ID}/.default"
TOKEN_EXCHANGE_SCOPE = "api://AzureADTokenExchange/.default"


def storage_credential(settings: Settings):
    """Managed identity in Azure (AZURE_CLIENT_ID names the user-assigned identity), developer login locally."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=settings.managed_identity_client_id or None)


def _certificate_bytes(value: str) -> bytes:
    """Accept PEM text or base64 PKCS#12 (what a Key Vault certificate reference yields)."""
    if "-----BEGIN" in value:
        return value.encode()
    return base64.b64decode(value)


def marketplace_credential(settings: Settings):
    """The TokenCredential for the marketplace app registration (never the managed identity's own id)."""
    from azure import identity

    tenant, client = settings.marketplace_tenant_id, settings.marketplace_client_id
    if settings.marketplace_use_federated_identity:
        managed = identity.ManagedIdentityCredential(client_id=settings.managed_identity_client_id or None)

        def assertion() -> str:
            return managed.get_token(TOKEN_EXCHANGE_SCOPE).token

        return identity.ClientAssertionCredential(tenant, client, assertion)
    if settings.marketplace_client_certificate:
        return identity.CertificateCredential(
            tenant,
            client,
            certificate_data=_certificate_bytes(settings.marketplace_client_certificate),
            password=settings.marketplace_client_certificate_password or None,
        )
    return identity.ClientSecretCredential(tenant, client, settings.marketplace_client_secret)
