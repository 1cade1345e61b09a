"""The plaza gRPC servicer: protobuf in, use case, protobuf out. No rules live here."""

from __future__ import annotations

from typing import TypeAlias

import grpc
from groupchat.plaza.v1 import plaza_pb2 as pb
from groupchat.plaza.v1 import plaza_pb2_grpc

from services.kit.paging import decode_page_token, encode_page_token
from services.kit.rpc import current_identity
from services.plaza.app import CardPage, PlazaApp
from services.plaza.domain import Card
from services.plaza.mapping import (
    card_to_proto,
    category_name,
    category_value,
    insights_to_proto,
    sort_from,
    summary_to_proto,
)

Ctx: TypeAlias = grpc.aio.ServicerContext

EDITOR_ROLE = "editor"


def _next_token(page: CardPage) -> str:
    return encode_page_token(page.next_position) if page.next_position else ""


# Cards converted lately, by value: a popular page's cards are the same objects for a
# second (the ranking cache), so each is converted once, not on every request.
CONVERTED_CARDS_KEPT = 4096


class PlazaServicer(plaza_pb2_grpc.PlazaServicer):
    def __init__(self, app: PlazaApp) -> None:
        self._app = app
        self._converted: dict[Card, pb.GroupCard] = {}

    def _cards(self, cards: list[Card]) -> list[pb.GroupCard]:
        converted = self._converted
        found = []
        for card in cards:
            proto = converted.get(card)
            if proto is None:
                if len(converted) >= CONVERTED_CARDS_KEPT:
                    converted.clear()
                proto = converted[card] = card_to_proto(card)
            found.append(proto)
        return found

    async def BrowsePlaza(
        self, request: pb.BrowsePlazaRequest, context: Ctx
    ) -> pb.BrowsePlazaResponse:
        page = await self._app.browse(
            category_name(request.category),
            request.only_with_space,
            sort_from(request.sort),
            request.page_size,
            decode_page_token(request.page_token),
        )
        return pb.BrowsePlazaResponse(
            cards=self._cards(page.cards), next_page_token=_next_token(page)
        )

    async def SearchGroups(
        self, request: pb.SearchGroupsRequest, context: Ctx
    ) -> pb.SearchGroupsResponse:
        page = await self._app.search(
            request.query,
            category_name(request.category),
            request.only_with_space,
            request.page_size,
            decode_page_token(request.page_token),
        )
        return pb.SearchGroupsResponse(
            cards=self._cards(page.cards), next_page_token=_next_token(page)
        )

    async def ListSelectedGroups(
        self, request: pb.ListSelectedGroupsRequest, context: Ctx
    ) -> pb.ListSelectedGroupsResponse:
        cards = await self._app.selected_shelf(category_name(request.category), request.page_size)
        return pb.ListSelectedGroupsResponse(cards=self._cards(cards))

    async def SetGroupSelected(
        self, request: pb.SetGroupSelectedRequest, context: Ctx
    ) -> pb.SetGroupSelectedResponse:
        caller = current_identity()
        card = await self._app.set_selected(
            caller.user_id, caller.has_role(EDITOR_ROLE), request.group_id, request.selected
        )
        return pb.SetGroupSelectedResponse(card=card_to_proto(card))

    async def ListCategories(
        self, request: pb.ListCategoriesRequest, context: Ctx
    ) -> pb.ListCategoriesResponse:
        return pb.ListCategoriesResponse(
            categories=[
                pb.CategoryInfo(
                    category=category_value(c),  # type: ignore[arg-type]
                    display_name=name,
                    listed_groups=n,
                )
                for c, name, n in await self._app.categories()
            ]
        )

    async def GetGroupInsights(
        self, request: pb.GetGroupInsightsRequest, context: Ctx
    ) -> pb.GetGroupInsightsResponse:
        insights = await self._app.insights(
            current_identity().user_id, request.group_id, request.days
        )
        return insights_to_proto(request.group_id, insights, self._app.time_zone)

    async def ListMyGroupInsights(
        self, request: pb.ListMyGroupInsightsRequest, context: Ctx
    ) -> pb.ListMyGroupInsightsResponse:
        mine = await self._app.my_insights(
            current_identity().user_id,
            request.days,
            request.page_size,
            decode_page_token(request.page_token),
        )
        return pb.ListMyGroupInsightsResponse(
            groups=[summary_to_proto(s) for s in mine.groups],
            next_page_token=encode_page_token(mine.next_position) if mine.next_position else "",
            time_zone=self._app.time_zone,
            own_post_opens=mine.own_post_opens,
        )
