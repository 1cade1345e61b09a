"""Fill a running suite with a believable demo: `python -m tools.seed` (`make seed`).

Everything goes through the public API (`groupchat.gateway.v1.Gateway`) and the platform's
post events (tools.platform), as real clients and the platform would: a few hundred groups
across every interest category, most of them linked to one of their creator's own published
posts, members joining from the plaza, the Selected shelf, posts, search and invite links,
conversations in most groups, with posts shared into them (the creator's own and others'),
replies, reactions, a few messages recalled and a few announcements, visitors looking at
cards and members opening shared posts (so creators' funnels have figures), a few posts
hidden afterwards (so some groups show an unlinked post), and editors' picks on the
Selected shelf.

Run it twice with the same --seed and nothing is duplicated: groups are created with a
request id derived from the seed, messages carry client message ids, joining, reacting and
recalling are idempotent and choosing a pick is a setting. Only taps add up again: card
views and shared-post opens count each time, as taps do.

    GATEWAY_ADDRESS (127.0.0.1:50051), NATS_URL (nats://127.0.0.1:4222) say which suite; tokens
    are signed as `make token` signs them (tools.dev_keys).
"""

# Chinese names and messages use Chinese (full-width) punctuation.
# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from groupchat.content.v1 import content_pb2 as content_pb
from groupchat.gateway.v1 import gateway_pb2_grpc
from groupchat.groups.v1 import groups_pb2 as groups_pb
from groupchat.plaza.v1 import plaza_pb2 as plaza_pb

from services.kit.auth import SigningKey, mint_token
from services.kit.config import NatsCredentials
from services.kit.events import OutgoingEvent
from services.kit.logging import configure_logging
from services.kit.rpc_status import error_info
from tools.dev_keys import signing_key_from_env
from tools.nats_users import credentials_for
from tools.platform import post_event, publish

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

# What each category's groups talk about: (English topic, Chinese group names).
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "WORK": (
        ["remote work", "product managers", "first jobs", "side hustles", "career switchers"],
        ["打工人互助群", "远程办公交流", "产品经理成长营"],
    ),
    "EDUCATION": (
        ["IELTS prep", "grad school applications", "study with me", "learning Japanese"],
        ["考研上岸互助", "雅思7分冲刺", "每日打卡学习"],
    ),
    "FOOD": (
        ["matcha", "sourdough baking", "hotpot", "brunch spots", "bubble tea", "vegan recipes"],
        ["抹茶爱好者", "周末探店小分队", "一人食食谱"],
    ),
    "RELATIONSHIPS": (
        ["long-distance couples", "new parents' friendships", "making friends in a new city"],
        ["异地恋加油站", "社恐交友角"],
    ),
    "MAKEUP_BEAUTY": (
        ["skincare routines", "sensitive skin", "drugstore makeup", "nail art"],
        ["敏感肌护肤交流", "平价彩妆分享", "美甲灵感"],
    ),
    "FASHION": (
        ["capsule wardrobes", "vintage finds", "petite styling", "sneakers"],
        ["小个子穿搭", "古着淘货群", "通勤穿搭日记"],
    ),
    "TRAVEL": (
        ["solo travel", "Yunnan road trips", "budget backpacking", "Japan itineraries"],
        ["云南自驾攻略", "穷游搭子", "周末去哪儿"],
    ),
    "FITNESS": (
        ["home workouts", "marathon training", "pilates", "strength training for beginners"],
        ["帕梅拉打卡", "跑步搭子", "减脂餐交流"],
    ),
    "PARENTING": (
        ["toddler activities", "picky eaters", "bilingual kids", "sleep training"],
        ["新手妈妈互助", "亲子游攻略"],
    ),
    "PETS": (
        ["cat parents", "corgi owners", "adopting rescue dogs", "aquariums"],
        ["猫奴日常", "柯基家族", "领养代替购买"],
    ),
    "HOME_LIVING": (
        ["small apartment makeovers", "houseplants", "minimalism", "organising"],
        ["出租屋改造", "绿植养护", "断舍离打卡"],
    ),
    "GAMING": (
        ["cozy games", "Genshin Impact", "Switch co-op", "retro consoles"],
        ["原神开黑", "动森岛民交流"],
    ),
    "MUSIC": (
        ["indie playlists", "ukulele beginners", "live house nights", "city pop"],
        ["吉他入门", "livehouse 搭子"],
    ),
    "MOVIES_TV": (
        ["K-dramas", "film photography of movie sets", "documentaries", "anime this season"],
        ["追剧小分队", "豆瓣高分电影"],
    ),
    "BOOKS": (
        ["book club", "sci-fi readers", "poetry", "reading 50 books a year"],
        ["读书打卡", "科幻迷俱乐部"],
    ),
    "PHOTOGRAPHY": (
        ["film photography", "phone photography", "street photography", "portraits"],
        ["手机摄影技巧", "胶片摄影"],
    ),
    "TECH": (
        ["mechanical keyboards", "home labs", "AI tools", "learning Python"],
        ["数码好物分享", "程序员摸鱼群"],
    ),
    "PERSONAL_FINANCE": (
        ["budgeting", "saving for a first home", "index funds", "frugal living"],
        ["记账打卡", "理财小白入门", "极简省钱"],
    ),
    "ARTS_CRAFTS": (
        ["crochet", "watercolour", "pottery", "DIY candles"],
        ["钩针编织", "水彩入门", "手工达人"],
    ),
    "OUTDOORS": (
        ["hiking", "camping", "climbing", "cycling"],
        ["周末徒步", "露营装备交流", "骑行搭子"],
    ),
    "WELLNESS": (
        ["meditation", "better sleep", "journaling", "yoga"],
        ["早睡早起打卡", "冥想练习", "瑜伽日常"],
    ),
}
CITIES = ["Shanghai", "Beijing", "Shenzhen", "Chengdu", "Hangzhou", "Guangzhou", "Singapore"]
NAME_FORMS = [
    "{Topic} lovers",
    "{Topic} club",
    "Daily {topic}",
    "{Topic} in {city}",
    "{Topic} for beginners",
    "{Topic} circle",
    "{city} {topic} crew",
]
DESCRIPTION_FORMS = [
    "A friendly corner for {topic}: share tips, ask anything, post your progress.",
    "We swap {topic} finds, recommendations and honest reviews. Newcomers welcome!",
    "{Topic} people of {city}, unite. Weekly meetups, daily chats.",
    "Started after my {topic} post blew up. Be kind, no ads.",
]
CHINESE_DESCRIPTIONS = [
    "欢迎新朋友！一起交流经验、分享好物。",
    "禁止广告，友好交流～",
    "每天打卡，互相监督！",
]
POST_TITLES = [
    "My {topic} routine",
    "{Topic}: what I learned in 30 days",
    "Everything I wish I knew about {topic}",
    "{Topic} on a budget",
]
MESSAGES = [
    "Hi everyone! Just joined from your post 👋",
    "Anyone tried {topic} in {city}? Recommendations please!",
    "Sharing my notes on {topic}, hope it helps 📒",
    "This group is so useful, thank you!",
    "What got you into {topic}?",
    "Weekend meetup anyone?",
    "这个太实用了，收藏了",
    "求推荐！新手应该从哪里开始？",
    "哈哈哈同款",
    "Posted an update, would love feedback",
    "Good morning ☀️",
]
FIRST_NAMES = [
    "xiaoyu", "mei", "jun", "lily", "chen", "hao", "yuki", "sam", "lin", "wen",
    "ava", "leo", "nora", "kai", "zoe", "ming", "tian", "ruby", "max", "yan",
]  # fmt: skip
# Where joins come from, and how often (a post only when the group links one).
SOURCES: dict[groups_pb.JoinSource, int] = {
    groups_pb.PLAZA: 40,
    groups_pb.SELECTED_SHELF: 10,
    groups_pb.POST: 25,
    groups_pb.SEARCH: 15,
    groups_pb.INVITE_LINK: 10,
}
REACTIONS = ["\N{THUMBS UP SIGN}", "\N{FACE WITH TEARS OF JOY}", "\N{PARTY POPPER}"]
JOINS_PER_USER = 25  # below JOIN_RATE_LIMIT (30 per minute): one run never hits it
CREATE_ATTEMPTS = 30  # waiting for the groups service to project a just-published post
SEND_ATTEMPTS = 5  # a speaker of many groups may meet the send rate (SEND_RATE_LIMITED)
EDITOR = "editor_seed"


@dataclass(frozen=True)
class PostPlan:
    post_id: str
    title: str
    cover_url: str
    hidden_later: bool


@dataclass
class GroupPlan:
    index: int
    creator: str
    name: str
    description: str
    category: str
    capacity: int
    listed: bool
    post: PostPlan | None
    joins: list[tuple[str, groups_pb.JoinSource]]
    messages: list[str]
    group_id: str = ""
    invite_code: str = ""
    members: list[str] = field(default_factory=list)


@dataclass
class Tally:
    """What the run did, by outcome, for the summary."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] += n


def plan_demo(seed: int, group_count: int) -> list[GroupPlan]:
    """The whole demo, decided up front from the seed: the same seed, the same demo."""
    rng = random.Random(seed)
    categories = list(TOPICS)
    sizes = [_group_size(rng) for _ in range(group_count)]
    user_count = max(60, sum(sizes) // JOINS_PER_USER + 20)
    users = [f"{FIRST_NAMES[i % len(FIRST_NAMES)]}{i:04d}" for i in range(user_count)]
    creators = users[: max(20, group_count * 2 // 5)]
    budget = Counter({user: JOINS_PER_USER for user in users})
    plans = []
    for index in range(group_count):
        category = categories[index % len(categories)]  # every category gets groups
        topics, chinese = TOPICS[category]
        topic, city = rng.choice(topics), rng.choice(CITIES)
        chinese_name = rng.random() < 0.3
        if chinese_name:
            name = rng.choice(chinese)
            description = rng.choice(CHINESE_DESCRIPTIONS)
        else:
            name = _fill(rng.choice(NAME_FORMS), topic, city)
            description = _fill(rng.choice(DESCRIPTION_FORMS), topic, city)
        creator = rng.choice(creators)
        post = None
        if rng.random() < 0.6:
            post = PostPlan(
                post_id=f"seed{seed}_p{index}",
                title=name if chinese_name else _fill(rng.choice(POST_TITLES), topic, city),
                cover_url=f"https://picsum.photos/seed/seed{seed}p{index}/600/800",
                hidden_later=rng.random() < 0.03,
            )
        candidates = [u for u in users if u != creator and budget[u] > 0]
        members = rng.sample(candidates, min(sizes[index], len(candidates)))
        budget.subtract(members)
        sources = [s for s in SOURCES if post or s != groups_pb.POST]
        weights = [SOURCES[s] for s in sources]
        talk = rng.random() < 0.75
        plans.append(
            GroupPlan(
                index=index,
                creator=creator,
                name=name[:50],
                description=description,
                category=category,
                capacity=rng.choice([0, 0, 0, 50, 100, 200]),
                listed=rng.random() < 0.85,
                post=post,
                joins=[(m, rng.choices(sources, weights)[0]) for m in members],
                messages=[
                    _fill(rng.choice(MESSAGES), topic, city)
                    for _ in range(rng.randint(1, 30) if talk else 0)
                ],
            )
        )
    for plan in plans:
        if plan.capacity:
            plan.joins = plan.joins[: plan.capacity - 1]
    return plans


def _group_size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.6:
        return rng.randint(2, 12)
    if roll < 0.9:
        return rng.randint(12, 40)
    return rng.randint(40, 150)


def _fill(form: str, topic: str, city: str) -> str:
    return form.format(topic=topic, Topic=topic[:1].upper() + topic[1:], city=city)


class Seeder:
    """Carries out a plan against a running suite, `concurrency` calls at a time."""

    def __init__(
        self,
        gateway: str,
        nats_url: str,
        key: SigningKey,
        seed: int,
        concurrency: int,
        credentials: NatsCredentials | None = None,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(gateway)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._nats_url = nats_url
        self._credentials = credentials
        self._key = key
        self._seed = seed
        self._slots = asyncio.Semaphore(concurrency)
        self._tokens: dict[str, str] = {}
        self.tally = Tally()

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self, user: str, roles: list[str] | None = None) -> Metadata:
        if user not in self._tokens:
            self._tokens[user] = mint_token(self._key, user, roles, ttl_seconds=3600)
        return (("authorization", f"Bearer {self._tokens[user]}"),)

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: object, metadata: Metadata
    ) -> T:
        """One call within the concurrency bound; retried while the suite is UNAVAILABLE
        (every call of the seed is safe to repeat)."""
        for attempt in range(5):
            async with self._slots:
                try:
                    return await method(request, metadata=metadata, timeout=10)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                        raise
            await asyncio.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    def _refusal(self, error: grpc.aio.AioRpcError) -> str:
        info = error_info(error)
        return info.reason if info else error.code().name

    async def publish_posts(self, plans: list[GroupPlan]) -> None:
        events = [
            post_event("publish", p.post.post_id, p.creator, title=p.post.title,
                       cover_url=p.post.cover_url)
            for p in plans
            if p.post
        ]  # fmt: skip
        await publish(self._nats_url, events, self._credentials)
        self.tally.add("posts published", len(events))

    async def create_group(self, plan: GroupPlan) -> None:
        request = groups_pb.CreateGroupRequest(
            name=plan.name,
            description=plan.description,
            category=groups_pb.Category.Value(plan.category),
            cover_url=plan.post.cover_url if plan.post else "",
            capacity=plan.capacity,
            listed=plan.listed,
            linked_post_id=plan.post.post_id if plan.post else "",
            request_id=f"seed-{self._seed}-{plan.index}",
        )
        metadata = self._metadata(plan.creator)
        for attempt in range(CREATE_ATTEMPTS):
            try:
                reply = await self._call(self._stub.CreateGroup, request, metadata)
            except grpc.aio.AioRpcError as error:
                reason = self._refusal(error)
                if reason == "POST_NOT_FOUND" and attempt + 1 < CREATE_ATTEMPTS:
                    # The post event is on its way to the groups service's projection.
                    await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
                    continue
                self.tally.add(f"groups refused: {reason}")
                return
            plan.group_id = reply.group.group_id
            if not plan.listed:
                # An unlisted group is joined only with an invite: its creator hands one out.
                invite = await self._call(
                    self._stub.CreateInvite,
                    groups_pb.CreateInviteRequest(group_id=plan.group_id),
                    metadata,
                )
                plan.invite_code = invite.invite.code
            self.tally.add("groups")
            self.tally.add(f"groups in {plan.category}")
            if reply.group.linked_post_id:
                self.tally.add("groups linked to a post")
            return

    async def join(self, plan: GroupPlan, user: str, source: groups_pb.JoinSource) -> None:
        request = groups_pb.JoinGroupRequest(
            group_id=plan.group_id, source=source, invite_code=plan.invite_code
        )
        metadata = self._metadata(user)
        try:
            reply = await self._call(self._stub.JoinGroup, request, metadata)
        except grpc.aio.AioRpcError as error:
            self.tally.add(f"joins refused: {self._refusal(error)}")
            return
        plan.members.append(user)
        self.tally.add("joins" if reply.joined else "joins already made")
        self.tally.add(f"joins from {groups_pb.JoinSource.Name(source)}")

    async def converse(self, plan: GroupPlan, rng: random.Random) -> None:
        """The group's messages, one after another so that the conversation reads in order."""
        joined = set(plan.members)  # filled in completion order: the plan's order is stable
        speakers = [plan.creator, *(user for user, _ in plan.joins if user in joined)]
        for n, text in enumerate(plan.messages):
            request = groups_pb.SendGroupMessageRequest(
                group_id=plan.group_id, text=text, client_msg_id=f"seed-{self._seed}-{n}"
            )
            if await self._send(rng.choice(speakers), request):
                self.tally.add("messages")

    async def engage(self, plan: GroupPlan, others: list[PostPlan], rng: random.Random) -> None:
        """What members do besides talking: the creator shares their post (and sometimes
        an announcement), a member shares someone else's, replies, reactions, a message
        recalled at once; visitors look at the card and members open what was shared."""
        if not plan.members:
            return
        group = plan.group_id
        creator = self._metadata(plan.creator)
        shares: list[tuple[str, groups_pb.SendGroupMessageRequest]] = []
        if plan.post:
            text = "New post, tell me what you think!"
            shares.append((plan.creator, self._message(plan, "share", text, plan.post.post_id)))
        if others and rng.random() < 0.4:
            post = rng.choice(others)
            text = "Saw this and thought of you all"
            shares.append(
                (rng.choice(plan.members), self._message(plan, "tip", text, post.post_id))
            )
        shared = [sent for user, request in shares if (sent := await self._send(user, request))]
        self.tally.add("posts shared", len(shared))
        if plan.messages:
            reply = self._message(plan, "reply", "+1, same here")
            reply.reply_to_seq = 1
            if await self._send(rng.choice(plan.members), reply):
                self.tally.add("replies")
            for user in rng.sample(plan.members, min(len(plan.members), rng.randint(0, 8))):
                request = groups_pb.ReactToGroupMessageRequest(
                    group_id=group, seq=1, emoji=rng.choice(REACTIONS)
                )
                await self._tried("reactions", self._stub.ReactToGroupMessage, request, user)
        if rng.random() < 0.15:
            oops = await self._send(plan.creator, self._message(plan, "oops", "oops, wrong group"))
            if oops:
                request = groups_pb.RecallGroupMessageRequest(group_id=group, seq=oops.seq)
                await self._tried("messages recalled", self._stub.RecallGroupMessage, request,
                                  plan.creator)  # fmt: skip
        if rng.random() < 0.3:
            request = groups_pb.SetGroupAnnouncementRequest(
                group_id=group, text="Welcome! Read the pinned rules before posting."
            )
            await self._call(self._stub.SetGroupAnnouncement, request, creator)
            self.tally.add("announcements")
        for _ in range(rng.randint(0, 4) if plan.listed else 0):
            visitor = f"visitor{rng.randrange(1000):03d}"
            request = groups_pb.GetGroupRequest(group_id=group)
            await self._tried("card views", self._stub.GetGroup, request, visitor)
        for message in shared:
            for user in rng.sample(plan.members, min(len(plan.members), rng.randint(0, 5))):
                request = content_pb.OpenSharedPostRequest(group_id=group, seq=message.seq)
                await self._tried("shared-post opens", self._stub.OpenSharedPost, request, user)

    def _message(
        self, plan: GroupPlan, label: str, text: str, post_id: str = ""
    ) -> groups_pb.SendGroupMessageRequest:
        return groups_pb.SendGroupMessageRequest(
            group_id=plan.group_id,
            text=text,
            shared_post_id=post_id,
            client_msg_id=f"seed-{self._seed}-{label}",
        )

    async def _send(
        self, user: str, request: groups_pb.SendGroupMessageRequest
    ) -> groups_pb.GroupMessage | None:
        """Send as `user`, waiting as told while the send rate holds it back; None when
        refused."""
        metadata = self._metadata(user)
        for attempt in range(SEND_ATTEMPTS):
            try:
                reply = await self._call(self._stub.SendGroupMessage, request, metadata)
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                if self._refusal(error) == "SEND_RATE_LIMITED" and attempt + 1 < SEND_ATTEMPTS:
                    # A busy speaker of many groups: wait as told (the same client_msg_id).
                    await asyncio.sleep(float(info.metadata["retry_after_seconds"]) if info else 1)
                    continue
                self.tally.add(f"messages refused: {self._refusal(error)}")
                return None
            return reply.message
        return None

    async def _tried(
        self, what: str, method: Callable[..., Awaitable[T]], request: object, user: str
    ) -> None:
        """One call as `user`, tallied as `what` or as refused with its reason."""
        try:
            await self._call(method, request, self._metadata(user))
        except grpc.aio.AioRpcError as error:
            self.tally.add(f"{what} refused: {self._refusal(error)}")
            return
        self.tally.add(what)

    async def hide_posts(self, plans: list[GroupPlan]) -> None:
        events: list[OutgoingEvent] = [
            post_event("hide", p.post.post_id, p.creator)
            for p in plans
            if p.post and p.post.hidden_later and p.group_id
        ]
        if events:
            await publish(self._nats_url, events, self._credentials)
        self.tally.add("posts hidden afterwards (their groups are unlinked)", len(events))

    async def pick(self, plans: list[GroupPlan], count: int) -> None:
        """Editors' picks: the liveliest listed groups, one per category first."""
        listed = [p for p in plans if p.group_id and p.listed]
        listed.sort(key=lambda p: (len(p.members), len(p.messages)), reverse=True)
        chosen: list[GroupPlan] = []
        for plan in listed:
            if len(chosen) < count and plan.category not in {c.category for c in chosen}:
                chosen.append(plan)
        metadata = self._metadata(EDITOR, ["editor"])
        for plan in chosen:
            request = plaza_pb.SetGroupSelectedRequest(group_id=plan.group_id, selected=True)
            try:
                await self._call(self._stub.SetGroupSelected, request, metadata)
            except grpc.aio.AioRpcError as error:
                self.tally.add(f"picks refused: {self._refusal(error)}")
                continue
            self.tally.add("editor picks")


async def seed_suite(
    gateway: str,
    nats_url: str,
    key: SigningKey,
    *,
    seed: int,
    group_count: int,
    picks: int,
    concurrency: int,
    credentials: NatsCredentials | None = None,
) -> Tally:
    """Seed a running suite, publishing posts as the platform (`credentials`); returns
    what was done."""
    plans = plan_demo(seed, group_count)
    rng = random.Random(seed + 1)
    seeder = Seeder(gateway, nats_url, key, seed, concurrency, credentials)
    try:
        await seeder.publish_posts(plans)
        await asyncio.gather(*(seeder.create_group(p) for p in plans))
        created = [p for p in plans if p.group_id]
        await asyncio.gather(*(seeder.join(p, u, s) for p in created for u, s in p.joins))
        await asyncio.gather(*(seeder.converse(p, random.Random(rng.random())) for p in created))
        posts = [p.post for p in created if p.post and not p.post.hidden_later]
        await asyncio.gather(
            *(seeder.engage(p, posts, random.Random(rng.random())) for p in created)
        )
        await seeder.hide_posts(created)
        await seeder.pick(created, picks)
    finally:
        await seeder.close()
    users = {p.creator for p in plans} | {user for p in plans for user, _ in p.joins}
    seeder.tally.add("users", len(users))
    return seeder.tally


def main() -> None:
    parser = argparse.ArgumentParser(description="Fill a running suite with demo data.")
    parser.add_argument("--groups", type=int, default=300, help="how many groups (300)")
    parser.add_argument("--seed", type=int, default=1, help="same seed, same demo (1)")
    parser.add_argument("--picks", type=int, default=12, help="editors' picks (12)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight (16)")
    args = parser.parse_args()
    configure_logging("seed", level="warning", fmt="console")  # a command: only trouble
    gateway = os.environ.get("GATEWAY_ADDRESS", "127.0.0.1:50051")
    started = time.monotonic()
    tally = asyncio.run(
        seed_suite(
            gateway,
            os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
            signing_key_from_env(),
            seed=args.seed,
            group_count=args.groups,
            picks=args.picks,
            concurrency=args.concurrency,
            credentials=credentials_for("platform"),
        )
    )
    print(f"seeded {gateway} in {time.monotonic() - started:.1f}s (seed {args.seed}):")
    for what, count in sorted(tally.counts.items()):
        print(f"  {what:<55} {count:>6}")


if __name__ == "__main__":
    main()
